"""Docs are code: every marked shell block of deploy/README.md and deploy/docs/*.md runs as written (doc_runner.py).

Each doc runs on loopback in its own temporary tree. one-machine.md covers the PKI, the SuperLink, two SuperNodes, a
two-round run stopped and resumed, status, a render node, a portrait and a revocation through the site commands, and
the review page over every component's log; it takes minutes, so it is marked slow. site-client.md runs in
test_site_client_doc.py. A doc whose commands drift from the code fails here, naming the doc and line.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from .doc_runner import REPO, DocRun, DocTree, extract_blocks, leftover_processes, operator_docs

SLOW_DOCS = {"one-machine.md"}
# A doc whose blocks need a setting-up the doc leaves to other roles runs in its own test, through the same runner.
OWN_TEST = {"site-client.md": Path(__file__).with_name("test_site_client_doc.py")}


def _docs_with_blocks() -> list[Path]:
    return [doc for doc in operator_docs() if extract_blocks(doc) and doc.name not in OWN_TEST]


def test_every_doc_with_marked_blocks_runs_once_through_the_runner():
    with_blocks = {doc.name for doc in operator_docs() if extract_blocks(doc)}
    assert with_blocks == {d.name for d in _docs_with_blocks()} | set(OWN_TEST), with_blocks
    for name, test in OWN_TEST.items():
        text = test.read_text()
        assert f'"{name}"' in text and "extract_blocks(" in text and "DocRun(" in text, test


def test_the_walkthrough_doc_has_runnable_blocks_for_every_role():
    blocks = extract_blocks(REPO / "deploy" / "docs" / "one-machine.md")
    code = "\n".join(b.code for b in blocks)
    for command in ("pki init", "flower-superlink", "coordinator register", "run-supernode.sh", "coordinator run",
                    "coordinator status", "coordinator stop", "render-node serve", "client consent grant",
                    "client enrol", "client render", "client revoke", "audit serve"):
        assert command in code, command
    assert sum(b.background for b in blocks) == 5  # SuperLink, two SuperNodes, render node, review page


def test_a_marker_without_a_bash_block_is_an_error(tmp_path):
    doc = tmp_path / "bad.md"
    doc.write_text("<!-- doctest -->\n```\necho hi\n```\n")
    with pytest.raises(ValueError, match="bad.md:1: doctest marker not followed by a ```bash block"):
        extract_blocks(doc)


def test_blocks_run_in_the_tree_with_paths_and_ports_substituted_and_a_failure_names_its_line(tmp_path):
    doc = REPO / "deploy" / "docs" / "_doctest_probe.md"
    doc.write_text("intro\n\n<!-- doctest -->\n```bash\nmkdir -p /etc/megaportrait/x\nPORT=9093\n```\n\n"
                   "<!-- doctest -->\n```bash\necho $PORT /etc/megaportrait /opt/megaportrait > seen.txt\nfalse\n```\n")
    try:
        first, second = extract_blocks(doc)
        tree = DocTree(tmp_path)
        run = DocRun(tree)
        run.run(first)
        assert (tmp_path / "etc" / "x").is_dir() and not Path("/etc/megaportrait/x").exists()
        with pytest.raises(AssertionError, match=r"deploy/docs/_doctest_probe.md:11: exit 1"):
            run.run(second)
        port, etc, opt = (tree.work / "seen.txt").read_text().split()
        assert int(port) == tree.ports[9093] != 9093  # a variable set in one block reaches the next
        assert (etc, opt) == (str(tmp_path / "etc"), str(tmp_path / "opt"))
        assert (tree.work / "deploy" / "coordinator" / "flwr" / "config.toml").read_text().count(
            f"127.0.0.1:{tree.ports[9093]}") == 1  # files copied from deploy/ point into the tree too
    finally:
        doc.unlink()


@pytest.mark.parametrize("doc", [pytest.param(d, id=d.name, marks=[pytest.mark.slow] if d.name in SLOW_DOCS else [])
                                 for d in _docs_with_blocks()])
def test_operator_doc_runs_as_written(doc, people, templates, capsys):
    # Not tmp_path: pytest prunes old base temp folders of the same user, and a concurrent pytest could delete this
    # tree while its servers still run. Kept on failure, for the logs.
    root = Path(tempfile.mkdtemp(prefix=f"megaportrait-doctest-{doc.stem}-"))
    tree = DocTree(root)
    photos = tree.work / "trial-photos"
    for site, person, files in (("alpha", "person-obama", people["obama"][:2]),
                                ("beta", "person-biden", people["biden"][:1])):
        (photos / site / person).mkdir(parents=True)
        for f in files:
            shutil.copy(f, photos / site / person / f.name)
    (tree.work / "trial-templates").mkdir()
    shutil.copy(templates[0], tree.work / "trial-templates" / "studio-1.jpg")
    run = DocRun(tree)
    try:
        for block in extract_blocks(doc):
            run.run(block)
    finally:
        run.close()
        left = leftover_processes(tree.root / "home")
        with capsys.disabled():
            print(f"\n{doc.name}: " + ", ".join(f"{where.split(':')[-1]}={s:.0f}s" for where, s in run.timings))
    assert not left, f"processes outlived {doc.name}'s servers: {left}"
    assert not (tree.work / "runs").exists(), "a documented command wrote runs/ into the operator's working folder"
    if not os.environ.get("MEGAPORTRAIT_DOCTEST_KEEP"):  # set it to look at a passing run's logs
        shutil.rmtree(root, ignore_errors=True)
