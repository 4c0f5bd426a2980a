"""The first hour, as a new user lives it: the README's quickstart played
literally against a fresh data folder, refused associations explained on
both sides, and ``pacsnode send`` with a folder of mixed files.

How the README's commands are played (the only substitutions):
- ``make run`` is the Makefile's ``run`` target: ``pacsnode serve`` with
  ``PACSNODE_CONFIG=pacsnode.example.yaml`` and ``PACSNODE_DATA_DIR=./data``
  (checked below against the Makefile). Here the data folder is the test's
  temporary one and the ports are free ones: ``PACSNODE_DICOM_PORT=0`` and
  ``PACSNODE_HTTP_PORT=0``, so the node picks them and prints them.
- ``.venv/bin/pacsnode`` is this interpreter's ``python -m pacsnode``, and
  ``127.0.0.1:11112`` becomes the port the node printed.
- The terminal is 250 columns wide (``COLUMNS``), so tables show whole UIDs.
- ``pacsnode demo send`` gets ``--slices 48 --size 128``, the smaller demo
  study the README itself offers, to keep the suite fast.
One node (module scope) serves every test here.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pydicom
import pytest
import yaml
from pydicom.data import get_testdata_file
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from pacsnode.core.settings import Settings
from pacsnode.db.session import create_db_engine
from pacsnode.firstrun import needs_link
from pacsnode.scp.status import explain_reject
from tests.support import Node, wait_for

ROOT = Path(__file__).resolve().parent.parent
SMALL_DEMO = ["--slices", "48", "--size", "128"]
TEST_FILES = Path(get_testdata_file("CT_small.dcm")).parent  # type: ignore[arg-type]


def quickstart_commands() -> list[str]:
    """The shell lines of the README's *First steps*, in order."""
    text = (ROOT / "README.md").read_text()
    section = re.search(r"^## First steps\n(.*?)(?=^## )", text, re.DOTALL | re.MULTILINE)
    assert section, "README.md has no '## First steps' section"
    commands = []
    for block in re.findall(r"```sh\n(.*?)```", section[1], re.DOTALL):
        for line in block.splitlines():
            line = line.split("#", 1)[0].strip()
            if line:
                commands.append(line)
    return commands


def test_readme_first_screen() -> None:
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 250
    assert "not a medical device" in text
    assert "make run" in text and "make test" in text
    assert "## Learn more" in text
    for link in re.findall(r"\]\((docs/[^)#]+)", text):
        assert (ROOT / link).is_file(), link
    # The Makefile's run target is what the quickstart test substitutes (the
    # viewer it prepares is installed by `make test` before the suite runs).
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^run: install viewer\n\t\$\(BIN\)/pacsnode serve$", makefile, re.MULTILINE)
    assert "PACSNODE_CONFIG ?= $(CURDIR)/pacsnode.example.yaml" in makefile
    assert "PACSNODE_DATA_DIR ?= $(CURDIR)/data" in makefile


@pytest.fixture(scope="module")
def first_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    """``make run`` on a fresh data folder (see the module docstring)."""
    commands = quickstart_commands()
    assert commands[0] == "make run", commands
    folder = tmp_path_factory.mktemp("first-run")
    config = yaml.safe_load((ROOT / "pacsnode.example.yaml").read_text())
    node = Node(data_dir=folder / "data", database_url="", config=config)
    node.start()
    try:
        yield node
    finally:
        node.stop()


def cli(node: Node, *args: str) -> subprocess.CompletedProcess[str]:
    """``pacsnode ARGS`` in a 250-column terminal (tables and messages unwrapped)."""
    return subprocess.run(
        [sys.executable, "-m", "pacsnode", *args],
        env={**node.env(), "COLUMNS": "250"},
        capture_output=True,
        text=True,
        timeout=300,
    )


def run_cli(node: Node, line: str, *extra: str) -> subprocess.CompletedProcess[str]:
    """A README command line with the substitutions of the module docstring."""
    args = shlex.split(line.replace("127.0.0.1:11112", f"127.0.0.1:{node.port}"))
    assert args[0] == ".venv/bin/pacsnode", line
    return cli(node, *args[1:], *extra)


def printed_link(node: Node) -> str:
    found = wait_for(
        lambda: re.search(r"(http://127\.0\.0\.1:\d+/ui/login/once/\S+)", node.log()),
        10,
        "the one-time login link",
    )
    return str(found[1])


@pytest.mark.slow
@pytest.mark.timeout(900)  # the models' first run; minutes when the 2 shared cores are busy
def test_readme_quickstart(first_run: Node) -> None:
    node = first_run
    commands = quickstart_commands()
    # The node prints the same next step as the README (with its own port).
    wait_for(lambda: "Next steps:" in node.log(), 10, "the next steps")
    demo = next(c for c in commands if " demo send " in c)
    printed = demo.replace(".venv/bin/pacsnode", "python -m pacsnode").replace(
        "127.0.0.1:11112", f"127.0.0.1:{node.port}"
    )
    assert printed in node.log()
    link = printed_link(node)
    assert link.startswith(node.api_url)

    # 2. The demo study.
    sent = run_cli(node, demo, *SMALL_DEMO)
    assert sent.returncode == 0, sent.stdout + sent.stderr
    study_uid = re.search(r"phantom study (\S+)", sent.stdout)[1]  # type: ignore[index]

    # 3. Its jobs run to the end; the README's commands show the study and results.
    def finished() -> bool:
        jobs = run_cli(node, ".venv/bin/pacsnode jobs", "--json").stdout.splitlines()
        states = [yaml.safe_load(line)["state"] for line in jobs]
        assert "failed" not in states, jobs
        return bool(states) and all(s == "succeeded" for s in states)

    wait_for(finished, 600, "the demo study's jobs")
    outputs = {}
    for line in commands[2:]:
        result = run_cli(node, line)
        assert result.returncode == 0, line + result.stderr
        outputs[line.split()[1]] = result.stdout
    assert "Studies (1 of 1)" in outputs["studies"] and study_uid in outputs["studies"]
    assert "ct-lesion-classifier" in outputs["results"]
    assert "(0 of" not in outputs["results"] and "(0 of" not in outputs["jobs"]

    # The dashboard: / leads there; the printed link signs in, once.
    with httpx.Client(base_url=node.api_url, timeout=30) as client:
        home = client.get("/")
        assert home.status_code == 307 and home.headers["location"] == "/ui/"
        assert client.get("/ui/").headers["location"] == "/ui/login"
        signed_in = client.get(link)
        assert signed_in.status_code == 303 and signed_in.headers["location"] == "/ui/"
        assert "pacsnode_token" in client.cookies
        page = client.get(f"/ui/studies/{study_uid}")
        assert page.status_code == 200
        assert "ct-lesion-classifier" in page.text
        # Every page works without anything from outside the node.
        for path in ("/ui/", "/ui/studies", "/ui/jobs", "/ui/exports", "/ui/models"):
            other = client.get(path)
            assert other.status_code == 200, path
            for text in (page.text, other.text):
                assert not re.search(r"""(src|href)=["']?(https?:)?//""", text), path
    with httpx.Client(base_url=node.api_url, timeout=30) as stranger:
        again = stranger.get(link)
        assert again.status_code == 403 and "already used" in again.text
        assert "pacsnode_token" not in stranger.cookies
    settings = Settings(data_dir=node.data_dir)
    engine = create_db_engine(settings.effective_database_url)
    try:
        assert not needs_link(settings, engine)  # an admin token exists: no link next time
    finally:
        engine.dispose()

    # The log tells the study's story; libraries stay quiet.
    log = node.log()
    for step in (
        f"study {study_uid} complete",
        "queued (cpu queue)",
        f"study {study_uid}: preprocess ",
        f"study {study_uid}: infer ",
        "model ct-lesion-classifier@",
        " written (",
    ):
        assert step in log, step
    assert "highdicom" not in log and "copy attributes" not in log
    assert "celery.worker.strategy" not in log and "alembic" not in log
    assert " -------------- " not in log  # no Celery banner


def test_refusals_are_explained(first_run: Node) -> None:
    node = first_run
    target = f"PACSNODE@127.0.0.1:{node.port}"
    # Unknown calling AE: `pacsnode demo send`.
    unknown = cli(node, "demo", "send", target, "--modalities", "ct", "--slices", "2",
                       "--size", "32", "--calling-ae", "NOBODY")  # fmt: skip
    assert unknown.returncode == 1
    said = " ".join((unknown.stdout + unknown.stderr).split())
    assert "calling AE title not recognized" in said and "add it under `peers`" in said
    assert "result 1" not in said
    wait_for(
        lambda: (
            "calling AE 'NOBODY' from 127.0.0.1 is not in peers: add it under `peers`" in node.log()
        ),
        10,
        "the node's explanation",
    )

    # Wrong called AE: `pacsnode echo`.
    wrong = cli(node, "echo", f"WRONG@127.0.0.1:{node.port}", "--calling-ae", "PACSNODE_DEMO")
    assert wrong.returncode == 1
    said = " ".join((wrong.stdout + wrong.stderr).split())
    assert "called AE title not recognized" in said and "put its own AE title before the @" in said
    wait_for(
        lambda: "called AE 'WRONG' is not this node's ae_title 'PACSNODE'" in node.log(),
        10,
        "the node's explanation",
    )

    # A known AE from a host not in its `hosts`: 127.0.0.2 is loopback too,
    # but the example configuration admits PACSNODE_DEMO from 127.0.0.1 only.
    ae = AE(ae_title="PACSNODE_DEMO")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="PACSNODE", bind_address=("127.0.0.2", 0))
    assert assoc.is_rejected
    rj = assoc.acceptor.primitive
    assert rj is not None
    hint = explain_reject(rj.result, rj.result_source, rj.diagnostic, "PACSNODE_DEMO", "PACSNODE")
    assert "with this machine's address in `hosts`" in hint
    wait_for(
        lambda: (
            "calling AE 'PACSNODE_DEMO' is in peers but not allowed from 127.0.0.2: "
            "add 127.0.0.2 to its `hosts`" in node.log()
        ),
        10,
        "the node's explanation",
    )
    # Nothing listens: said so, with the address.
    closed = cli(node, "echo", "PACSNODE@127.0.0.1:1", "--calling-ae", "PACSNODE_DEMO")
    assert closed.returncode == 1 and "cannot connect to PACSNODE@127.0.0.1:1" in closed.stderr


MIXED = {
    # file: (transfer syntax, frames) as stored; sent as stored
    "CT_small.dcm": "1.2.840.10008.1.2.1",
    "MR_small_jp2klossless.dcm": "1.2.840.10008.1.2.4.90",
    "SC_rgb_rle_2frame.dcm": "1.2.840.10008.1.2.5",  # multi-frame, RLE
    "JPEG-lossy.dcm": "1.2.840.10008.1.2.4.51",
    "rtdose.dcm": "1.2.840.10008.1.2",  # multi-frame RT Dose, implicit VR
}


def _stored(data_dir: Path) -> dict[str, str]:
    """SOP Instance UID → transfer syntax of every spooled instance."""
    found = {}
    for path in data_dir.rglob("*.dcm"):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception:
            continue
        found[str(ds.SOPInstanceUID)] = str(ds.file_meta.TransferSyntaxUID)
    return found


def test_send_a_folder_of_mixed_files(first_run: Node, tmp_path: Path) -> None:
    node = first_run
    folder = tmp_path / "mixed"
    (folder / "nested").mkdir(parents=True)
    expected = {}
    for i, (name, syntax) in enumerate(MIXED.items()):
        ds = pydicom.dcmread(TEST_FILES / name)
        assert str(ds.file_meta.TransferSyntaxUID) == syntax, name
        expected[str(ds.SOPInstanceUID)] = syntax
        (folder / ("nested" if i % 2 else "") / name).write_bytes((TEST_FILES / name).read_bytes())
    (folder / "notes.txt").write_text("not DICOM")
    dicomdir = Path(get_testdata_file("DICOMDIR"))  # type: ignore[arg-type]
    (folder / "DICOMDIR").write_bytes(dicomdir.read_bytes())

    sent = cli(node, "send", str(folder), f"PACSNODE@127.0.0.1:{node.port}", "--calling-ae",
                    "PACSNODE_SEND")  # fmt: skip
    said = " ".join(sent.stdout.split())
    assert sent.returncode == 0, sent.stdout + sent.stderr
    assert f"{len(MIXED)} stored, 0 failed, 2 skipped" in said
    assert "notes.txt: not a DICOM file" in said
    assert "DICOMDIR: not a storage SOP instance" in said

    def spooled() -> dict[str, str] | None:
        found = _stored(node.data_dir)
        return found if expected.keys() <= found.keys() else None

    stored = wait_for(spooled, 20, "the spooled instances")
    assert {uid: stored[uid] for uid in expected} == expected

    # One refused file: listed with its status, exit status 1.
    broken = pydicom.dcmread(TEST_FILES / "CT_small.dcm")
    del broken.StudyInstanceUID
    broken.SOPInstanceUID = "1.2.826.0.1.3680043.8.498.1"
    bad = tmp_path / "bad"
    bad.mkdir()
    broken.save_as(bad / "no-study-uid.dcm", enforce_file_format=True)
    refused = cli(node, "send", str(bad), str(folder / "CT_small.dcm"),
                       f"PACSNODE@127.0.0.1:{node.port}")  # fmt: skip
    said = " ".join(refused.stdout.split())
    assert refused.returncode == 1, said
    assert re.search(r"failed: \S*no-study-uid\.dcm: 0x[0-9A-F]{4} (Failure|Error)", said), said
    assert "1 stored, 1 failed" in said


def test_send_usage_errors(first_run: Node, tmp_path: Path) -> None:
    missing = cli(first_run, "send", str(tmp_path / "nothing"), "PACSNODE@127.0.0.1:104")
    assert missing.returncode == 2 and "no such file or folder" in missing.stderr
    lone = cli(first_run, "send", "PACSNODE@127.0.0.1:104")
    assert lone.returncode == 2
