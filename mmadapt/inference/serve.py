"""The web demo (gradio): composition, image chat and speech chat over one loaded model.

::

    backend = Backend(model, system_prompt, name="OUT", workspace=Path("/tmp/work"))
    launch(build_demo(backend), backend.workspace, host="127.0.0.1", port=7860)

Each browser tab keeps its own conversations (a :class:`ChatSession` per chat tab in
``gr.State``); every event that runs the model shares one queue slot, because the
modality context lives on the model and two forwards at once would mix their ids.
Answers stream as they are decoded. An :class:`InputError` (an unreadable file, no
input, ...) shows as a message in the page, and the conversation stays as it was.
"""

from __future__ import annotations

import html
import queue
import re
import shutil
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from urllib.parse import quote

import gradio as gr

from mmadapt.errors import InputError
from mmadapt.inference.chat import ChatSession
from mmadapt.model import MultimodalLM

# Every event that runs the model shares one slot (see the module docstring).
MODEL_SLOT = {"concurrency_id": "model", "concurrency_limit": 1}
MARKDOWN_IMAGE = re.compile(r"!\[([^\]]*)\]\(([^)\s]+)\)")
# System fonts only: the default theme would fetch Google Fonts, which offline machines cannot reach.
THEME = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])


@dataclass
class Backend:
    """What the demo's handlers share.

    Args:
        model: the loaded model (eval mode, on its device).
        system_prompt: the run's ``data.system_prompt`` (None keeps the template's default).
        name: what messages call the model, e.g. its run folder.
        workspace: where uploaded composition candidates and written articles go; the
            server must be allowed to serve files from it (see :func:`launch`).
    """

    model: MultimodalLM
    system_prompt: str | None
    name: str
    workspace: Path

    def chat(
        self,
        kind: str,
        session: ChatSession | None,
        history: list[dict],
        text: str,
        file: str | None,
        max_new_tokens: int,
        temperature: float,
    ) -> Iterator[tuple[list[dict], ChatSession, str, None]]:
        """Answer one chat turn, streaming.

        Args:
            kind: ``"image"`` or ``"audio"``: what ``file`` is.
            session: the tab's conversation so far (None before its first turn).
            history: the chatbot's messages so far.
            text: the typed question ('' for none).
            file: the turn's image or audio file, if any.
            max_new_tokens: longest answer in tokens.
            temperature: 0 for greedy decoding, else the sampling temperature.

        Yields:
            ``(history, session, text, file)``: the chatbot's messages with the answer so
            far, the conversation, and the cleared text box and file input.

        Raises:
            InputError: the turn's input is unusable (the message names what is wrong).
        """
        session = session or ChatSession(self.model, self.system_prompt, self.name)
        files = [file] if file else []
        turn = {"text": text.strip() or None, "images" if kind == "image" else "audios": files}
        settings = _generation_settings(max_new_tokens, temperature)
        shown = [*history, *({"role": "user", "content": {"path": path}} for path in files)]
        if turn["text"]:
            shown.append({"role": "user", "content": turn["text"]})
        for answer in _streamed(partial(session.ask, **turn, **settings)):
            yield [*shown, {"role": "assistant", "content": answer}], session, "", None

    def compose(
        self,
        instruction: str,
        files: Sequence[str] | None,
        num_images: str,
        max_new_tokens: int,
        temperature: float,
    ) -> Iterator[str]:
        """Write an illustrated article from uploaded candidate images, streaming.

        Args:
            instruction: what to write.
            files: the uploaded candidate images.
            num_images: ``"auto"`` or how many images to place.
            max_new_tokens: longest text in tokens.
            temperature: 0 for greedy decoding, else the sampling temperature.

        Yields:
            Markdown: the text so far while it is written, then the finished
            ``article.md`` with its images served from the workspace.

        Raises:
            InputError: no instruction, no or clashing images, or what ``compose`` refuses.
        """
        from mmadapt.inference.compose import compose

        if not instruction.strip():
            raise InputError("composition: write an instruction first")
        job = self.workspace / uuid.uuid4().hex
        candidates = _gather_candidates(files or [], job / "candidates")
        write = partial(
            compose, self.model, instruction.strip(), candidates, job / "article",
            num_images=num_images if num_images == "auto" else int(num_images),
            temperature=temperature, max_new_tokens=int(max_new_tokens), system_prompt=self.system_prompt,
        )
        yield from _streamed(write)
        yield served_markdown(job / "article" / "article.md")


def build_demo(backend: Backend) -> gr.Blocks:
    """The demo page: a composition tab, an image chat tab and a speech chat tab."""
    with gr.Blocks(title="mmadapt", analytics_enabled=False) as demo:
        gr.Markdown(f"# mmadapt\n`{backend.name}`")
        with gr.Tabs():
            with gr.Tab("Composition", id="composition"):
                _composition_tab(backend)
            with gr.Tab("Image chat", id="image-chat"):
                _chat_tab(backend, "image", "image-chat")
            with gr.Tab("Speech chat", id="speech-chat"):
                _chat_tab(backend, "audio", "speech-chat")
    return demo.queue()


def launch(demo: gr.Blocks, workspace: Path, host: str, port: int) -> None:
    """Serve ``demo`` on ``host:port`` until interrupted, allowed to serve files from ``workspace``."""
    demo.launch(
        server_name=host, server_port=port, allowed_paths=[str(workspace)], theme=THEME, ssr_mode=False
    )


def served_markdown(article: Path) -> str:
    """``article``'s Markdown with its relative image links turned into the server's file URLs."""

    def link(match: re.Match) -> str:
        alt, target = match.groups()
        if "://" in target or target.startswith(("/", "data:")):
            return match.group(0)
        return f"![{alt}](/gradio_api/file={quote(str((article.parent / target).resolve()))})"

    return MARKDOWN_IMAGE.sub(link, article.read_text())


def _chat_tab(backend: Backend, kind: str, prefix: str) -> None:
    """Inputs on the left, the conversation on the right; element ids start with ``prefix``."""
    session = gr.State(None)
    with gr.Row():
        with gr.Column(scale=2):
            file_input, text = _chat_inputs(kind, prefix)
            with gr.Row():
                send = gr.Button("Send", variant="primary", elem_id=f"{prefix}-send")
                clear = gr.Button("New conversation", elem_id=f"{prefix}-clear")
            max_new_tokens, temperature = _settings_inputs(64)
        with gr.Column(scale=3):
            chatbot = gr.Chatbot(label="Conversation", elem_id=f"{prefix}-log", height=480)

    def respond(session_, history, text_, file, max_new_tokens_, temperature_):
        yield from _as_message(backend.chat(kind, session_, history, text_, file, max_new_tokens_, temperature_))

    turn = {
        "fn": respond, "inputs": [session, chatbot, text, file_input, max_new_tokens, temperature],
        "outputs": [chatbot, session, text, file_input], **MODEL_SLOT,
    }
    send.click(**turn, api_name=prefix.replace("-", "_"))
    text.submit(**turn, api_visibility="private")
    clear.click(lambda: ([], None), outputs=[chatbot, session], queue=False, api_visibility="private")


def _chat_inputs(kind: str, prefix: str) -> tuple[gr.components.Component, gr.Textbox]:
    if kind == "image":
        image = gr.Image(type="filepath", label="Image", elem_id=f"{prefix}-file", height=240)
        return image, gr.Textbox(label="Question (optional)", elem_id=f"{prefix}-text")
    audio = gr.Audio(
        sources=["upload", "microphone"], type="filepath", label="Speech (upload or record)", elem_id=f"{prefix}-file"
    )
    hint = "Instruction (optional: the speech can be the instruction)"
    return audio, gr.Textbox(label=hint, elem_id=f"{prefix}-text")


def _composition_tab(backend: Backend) -> None:
    with gr.Row():
        with gr.Column(scale=2):
            instruction = gr.Textbox(label="Instruction", elem_id="compose-instruction", lines=3)
            files = gr.File(
                label="Candidate images", file_count="multiple", file_types=["image"], type="filepath",
                elem_id="compose-files",
            )
            num_images = gr.Dropdown(["auto", *map(str, range(1, 9))], value="auto", label="Images to place")
            write = gr.Button("Write", variant="primary", elem_id="compose-write")
            max_new_tokens, temperature = _settings_inputs(256)
        with gr.Column(scale=3):
            article = gr.Markdown(label="Article", elem_id="compose-article", container=True, min_height=480)

    def run(instruction_, files_, num_images_, max_new_tokens_, temperature_):
        yield from _as_message(backend.compose(instruction_, files_, num_images_, max_new_tokens_, temperature_))

    write.click(
        run, inputs=[instruction, files, num_images, max_new_tokens, temperature], outputs=article,
        api_name="compose", **MODEL_SLOT,
    )


def _settings_inputs(max_new_tokens: int) -> tuple[gr.Slider, gr.Slider]:
    with gr.Accordion("Generation settings", open=False):
        tokens = gr.Slider(1, 1024, value=max_new_tokens, step=1, label="Max new tokens")
        temperature = gr.Slider(0.0, 2.0, value=0.0, step=0.05, label="Temperature (0: greedy)")
    return tokens, temperature


def _as_message(outputs: Iterator) -> Iterator:
    """Pass ``outputs`` on; an InputError becomes a message in the page instead of a traceback."""
    try:
        yield from outputs
    except InputError as error:
        # gr.Error renders HTML; the message may quote a placeholder such as <image>.
        raise gr.Error(html.escape(" ".join(str(error).split()), quote=False), print_exception=False) from None


def _streamed(call: Callable[..., object]) -> Iterator[str]:
    """Run ``call(on_text=...)`` in a worker thread; yield the text so far after each piece.

    ``call``'s exception, if any, is raised once the pieces stop; otherwise the whole
    text is yielded once more at the end, so even an empty answer shows.
    """
    pieces: queue.SimpleQueue[str | None] = queue.SimpleQueue()
    with ThreadPoolExecutor(max_workers=1) as pool:
        future = pool.submit(call, on_text=pieces.put)
        future.add_done_callback(lambda _: pieces.put(None))
        text = ""
        for piece in iter(pieces.get, None):
            text += piece
            yield text
        future.result()
    yield text


def _generation_settings(max_new_tokens: int, temperature: float) -> dict:
    return {"max_new_tokens": int(max_new_tokens), "do_sample": temperature > 0, "temperature": temperature or 1.0}


def _gather_candidates(files: Sequence[str], folder: Path) -> Path:
    """Copy the uploaded images into ``folder`` under their own names."""
    if not files:
        raise InputError("composition: upload at least one candidate image")
    folder.mkdir(parents=True)
    for path in map(Path, files):
        if (folder / path.name).exists():
            raise InputError(f"composition: two candidate images are named {path.name}; rename one")
        shutil.copy(path, folder / path.name)
    return folder
