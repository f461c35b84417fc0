"""``mmadapt serve``: the gradio app in process, its errors, and a real browser driving the served page.

The browser test needs Playwright (the ``dev`` extra) and the system's Chromium
(Debian package ``chromium``, installed by ``.ci/run``); it skips, saying which is
missing, without them. Playwright's own browser downloads are never used.
"""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from mmadapt.cli import main
from mmadapt.inference.chat import ChatSession
from tests.helpers import (
    SHAPES, SPEECH, incomplete_run, run_of_another_base, run_train, shapes_subset, tiny_overrides, train_env,
)

gr = pytest.importorskip("gradio", reason="gradio is not installed (pip install -e '.[demo]')")
from mmadapt.inference.serve import Backend, build_demo  # noqa: E402  (needs gradio)

# An untied output head makes greedy answers depend on the input (see tests/test_chat.py).
UNTIED = "model.llm.config.tie_word_embeddings=false"
PICTURE = SHAPES / "images" / "train-00000.png"
SPOKEN = SPEECH / "audio" / "test-00000.opus"
QUESTION = "What shapes are in the picture?"
SERVER_START_S = 90


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A tiny image + speech run trained for one step on a few shapes records."""
    folder = tmp_path_factory.mktemp("serve")
    data = shapes_subset(folder / "data", n_train=8, n_test=4)
    result = run_train(tiny_overrides(data, folder / "run", "train.max_steps=1", UNTIED), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return folder / "run"


@pytest.fixture(scope="module")
def backend(run, tmp_path_factory) -> Backend:
    loaded = ChatSession.from_run(run)
    return Backend(loaded.model, loaded.system_prompt, str(run), tmp_path_factory.mktemp("workspace"))


@pytest.fixture(scope="module")
def demo(backend) -> gr.Blocks:
    return build_demo(backend)


def _endpoint(demo: gr.Blocks, api_name: str):
    return next(block_fn.fn for block_fn in demo.fns.values() if block_fn.api_name == api_name)


def test_demo_has_three_tabs_and_one_model_queue(demo):
    tabs = [block.label for block in demo.blocks.values() if isinstance(block, gr.Tab)]
    assert tabs == ["Composition", "Image chat", "Speech chat"]
    audio = next(block for block in demo.blocks.values() if isinstance(block, gr.Audio))
    assert audio.sources == ["upload", "microphone"] and audio.type == "filepath"
    # Two forwards at once would mix the modality ids that live on the shared model.
    model_fns = [fn for fn in demo.fns.values() if fn.name in ("respond", "run")]  # send, submit; write
    assert sorted(fn.api_name for fn in model_fns if fn.api_visibility == "public") == [
        "compose", "image_chat", "speech_chat"
    ]
    assert len(model_fns) == 5 and {(fn.concurrency_id, fn.concurrency_limit) for fn in model_fns} == {("model", 1)}


@pytest.mark.parametrize(
    "api_name, text, file, turn",
    [
        ("image_chat", QUESTION, PICTURE, {"text": QUESTION, "images": [PICTURE]}),
        ("speech_chat", "", SPOKEN, {"audios": [SPOKEN]}),  # the speech is the instruction
    ],
)
def test_chat_endpoint_streams_the_sessions_answer_and_keeps_the_conversation(
    demo, backend, api_name, text, file, turn
):
    expected, _ = ChatSession(backend.model, backend.system_prompt).ask(**turn, max_new_tokens=12)
    outputs = list(_endpoint(demo, api_name)(None, [], text, str(file), 12, 0.0))
    history, session, cleared_text, cleared_file = outputs[-1]
    assert history[-1] == {"role": "assistant", "content": expected} and expected
    assert history[0] == {"role": "user", "content": {"path": str(file)}}
    assert (cleared_text, cleared_file) == ("", None)
    answers_so_far = [step[0][-1]["content"] for step in outputs]
    assert len(answers_so_far) > 2 and all(expected.startswith(shown) for shown in answers_so_far)
    # A follow-up goes to the same conversation, which still holds the file.
    follow_up = list(_endpoint(demo, api_name)(session, history, "And then?", None, 4, 0.0))
    assert follow_up[-1][1] is session and len(session.messages) == 4
    assert len(session.images) + len(session.audios) == 1


def test_input_error_is_a_page_message_and_leaves_the_conversation(demo, backend):
    session = ChatSession(backend.model, backend.system_prompt)
    with pytest.raises(gr.Error) as raised:
        list(_endpoint(demo, "image_chat")(session, [], "What is <image> here?", None, 4, 0.0))
    assert raised.value.message == (
        "the text 'What is &lt;image&gt; here?' holds a placeholder; pass the files as images or audio instead"
    )
    assert session.messages == []
    with pytest.raises(gr.Error, match="nothing to answer"):
        list(_endpoint(demo, "speech_chat")(None, [], "  ", None, 4, 0.0))


class FakeCompose:
    """Stands in for ``mmadapt.inference.compose``: records its call, writes an article with one image."""

    def __init__(self) -> None:
        self.calls: list[dict] = []

    def compose(self, model, instruction, candidates_dir, out_dir, num_images="auto", outline=None, references=(),
                seed=0, temperature=0.0, max_new_tokens=256, ranker=None, on_text=None, *, system_prompt=None) -> Path:
        candidates = sorted(path.name for path in Path(candidates_dir).iterdir())
        self.calls.append({
            "model": model, "instruction": instruction, "candidates": candidates, "num_images": num_images,
            "temperature": temperature, "max_new_tokens": max_new_tokens, "system_prompt": system_prompt,
        })
        out_dir = Path(out_dir)
        (out_dir / "images").mkdir(parents=True)
        shutil.copy(Path(candidates_dir) / candidates[0], out_dir / "images" / "one.png")
        for piece in ("# Shapes\n", "Two ", "squares."):
            on_text(piece)
        (out_dir / "article.md").write_text("# Shapes\nTwo squares.\n\n![first](images/one.png)\n")
        return out_dir


def test_compose_endpoint_calls_compose_and_serves_its_images(demo, backend, monkeypatch):
    fake = FakeCompose()
    monkeypatch.setitem(sys.modules, "mmadapt.inference.compose", fake)
    files = [str(SHAPES / "images" / f"train-0000{i}.png") for i in range(2)]
    outputs = list(_endpoint(demo, "compose")(" Write about shapes. ", files, "2", 100, 0.0))
    assert fake.calls == [{
        "model": backend.model, "instruction": "Write about shapes.",
        "candidates": ["train-00000.png", "train-00001.png"], "num_images": 2, "temperature": 0.0,
        "max_new_tokens": 100, "system_prompt": backend.system_prompt,
    }]
    assert outputs[:3] == ["# Shapes\n", "# Shapes\nTwo ", "# Shapes\nTwo squares."]
    article, link = outputs[-1].split("![first](/gradio_api/file=")
    assert article == "# Shapes\nTwo squares.\n\n"
    served = Path(link.removesuffix(")\n"))
    assert served.is_file() and served.is_relative_to(backend.workspace.resolve())


@pytest.mark.parametrize(
    "instruction, files, problem",
    [("", [str(PICTURE)], "write an instruction"), ("Write.", [], "upload at least one"),
     ("Write.", [str(PICTURE), str(PICTURE)], "two candidate images are named train-00000.png")],
)
def test_compose_endpoint_refuses_unusable_input(demo, monkeypatch, instruction, files, problem):
    fake = FakeCompose()
    monkeypatch.setitem(sys.modules, "mmadapt.inference.compose", fake)
    with pytest.raises(gr.Error, match=problem):
        list(_endpoint(demo, "compose")(instruction, files, "auto", 16, 0.0))
    assert fake.calls == []


@pytest.mark.parametrize(
    "make_folder, named",
    [(incomplete_run, "is not a finished mmadapt run"), (run_of_another_base, "the base model changed")],
    ids=["incomplete", "other-base"],
)
def test_serve_refuses_an_unusable_run_with_one_line(run, tmp_path, capsys, make_folder, named):
    folder = make_folder(run, tmp_path / "run")
    assert main(["serve", "--checkpoint", str(folder), "--port", str(_free_port())]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1
    assert captured.err.startswith(f"error: {folder}") and named in captured.err


def test_serve_refuses_a_busy_port_before_loading(tmp_path, capsys):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["serve", "--checkpoint", str(tmp_path / "never-read"), "--port", str(port)]) == 2
    assert capsys.readouterr().err == (
        f"error: serve: cannot listen on 127.0.0.1:{port} (Address already in use); choose another --port\n"
    )


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def server(run, tmp_path):
    """``mmadapt serve`` on a free local port, until the test ends; yields its URL."""
    port = _free_port()
    log = tmp_path / "serve.log"
    command = [str(Path(sys.executable).parent / "mmadapt"), "serve", "--checkpoint", str(run), "--port", str(port)]
    with log.open("w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=train_env())
    url = f"http://127.0.0.1:{port}/"
    try:
        _wait_until_served(url, process, log)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _wait_until_served(url: str, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + SERVER_START_S
    while time.monotonic() < deadline:
        assert process.poll() is None, f"mmadapt serve exited with {process.returncode}:\n{log.read_text()[-3000:]}"
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"mmadapt serve did not answer {url} within {SERVER_START_S} s:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="module")  # module scope: checked before the module-scoped training run
def chromium() -> str:
    """The system Chromium's path; skips, saying what is missing, without it or Playwright."""
    pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install '.[dev]')")
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.skip("no system Chromium (apt-get install chromium; .ci/run installs it)")
    return path


def test_browser_asks_about_an_image_and_sees_an_answer(chromium, server):
    from playwright.sync_api import expect, sync_playwright

    # No network here: keep Chromium from reaching out (background services, first-run pages).
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run"]
    # The browser closes before the server stops, so no open connection delays its shutdown.
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=flags)
        try:
            page = browser.new_page()
            page.goto(server)
            page.get_by_role("tab", name="Image chat").click()
            page.locator("#image-chat-file input[type=file]").set_input_files(str(PICTURE))
            page.locator("#image-chat-text textarea").fill(QUESTION)
            page.locator("#image-chat-send").click()
            user = page.locator('#image-chat-log [data-testid="user"]')  # the picture, then the question
            expect(user).to_have_count(2, timeout=30_000)
            expect(user.first.locator("img")).to_have_count(1)
            expect(user.last).to_have_text(QUESTION)
            answer = page.locator('#image-chat-log [data-testid="bot"]')
            expect(answer).to_have_count(1, timeout=30_000)
            expect(answer).to_have_text(re.compile(r"\S"))
            expect(page.locator("#image-chat-text textarea")).to_have_value("")
        finally:
            browser.close()
