"""The data folder's layout and the one atomic writer (pacsnode.core.layout)."""

from __future__ import annotations

from pathlib import Path
from typing import BinaryIO

import pytest

from pacsnode.core.layout import DataLayout, atomic_path, atomic_write, durable_replace
from pacsnode.core.settings import Settings


def test_the_layout_names_every_folder_once(tmp_path: Path) -> None:
    layout = DataLayout(tmp_path)
    assert layout.spool == tmp_path / "spool"
    assert layout.incoming == tmp_path / "spool" / ".incoming"
    assert layout.results == tmp_path / "results"
    assert layout.preprocessed == tmp_path / "cache" / "preprocessed"
    assert layout.broker == tmp_path / "broker"
    assert layout.database == tmp_path / "pacsnode.db"
    settings = Settings(data_dir=tmp_path)
    assert settings.layout == layout
    assert settings.spool_dir == layout.spool
    assert settings.effective_database_url == f"sqlite:///{layout.database}"


@pytest.mark.parametrize("content", [b"\x00bytes", "text é", "callable"])
def test_atomic_write_writes_whole_files(tmp_path: Path, content: bytes | str) -> None:
    target = tmp_path / "new" / "folder" / "file.bin"
    if content == "callable":
        atomic_write(target, lambda fh: fh.write(b"from a writer"))
        assert target.read_bytes() == b"from a writer"
    else:
        atomic_write(target, content)
        expected = content.encode() if isinstance(content, str) else content
        assert target.read_bytes() == expected
    assert [p.name for p in target.parent.iterdir()] == ["file.bin"]


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "file.json"
    atomic_write(target, "old")

    def broken(fh: BinaryIO) -> None:
        fh.write(b"half of the new")
        raise RuntimeError("writer failed")

    with pytest.raises(RuntimeError, match="writer failed"):
        atomic_write(target, broken)
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["file.json"]


def test_atomic_path_keeps_the_suffix_a_writer_insists_on(tmp_path: Path) -> None:
    target = tmp_path / "model.weights.h5"
    with atomic_path(target, suffix=".weights.h5") as tmp:
        assert tmp.parent == tmp_path and tmp.name.endswith(".weights.h5")
        tmp.write_bytes(b"weights")
    assert target.read_bytes() == b"weights" and not tmp.exists()


def test_durable_replace_moves_and_reports_the_size(tmp_path: Path) -> None:
    source, target = tmp_path / "incoming.dcm", tmp_path / "final.dcm"
    source.write_bytes(b"x" * 1234)
    assert durable_replace(source, target) == 1234
    assert not source.exists() and target.read_bytes() == b"x" * 1234
    with pytest.raises(FileNotFoundError):
        durable_replace(source, target)
    assert target.read_bytes() == b"x" * 1234
